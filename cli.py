"""Run the `rqae` command line from a checkout: `python cli.py --help`."""
from rqae_pipeline.cli import main

main()
