import sys

from trl_lifealign.cli import main

sys.exit(main())
