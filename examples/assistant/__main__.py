import sys

from examples.assistant.app import main

sys.exit(main())
