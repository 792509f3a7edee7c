import sys

from spt_embed.cli.main import main

sys.exit(main())
