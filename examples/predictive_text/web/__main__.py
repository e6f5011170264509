import sys

from examples.predictive_text.web.server import main

sys.exit(main())
