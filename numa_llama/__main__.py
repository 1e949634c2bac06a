import sys

from numa_llama.cli import main

sys.exit(main())
