import sys

from examples.predictive_text.app import main

sys.exit(main())
