import sys

from llmreg.cli import main


sys.exit(main())
