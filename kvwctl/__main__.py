from kvwctl.cli import main

main()
