import sys

from spt_embed.cli import main

sys.exit(main())
