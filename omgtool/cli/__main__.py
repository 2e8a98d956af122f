from omgtool.cli.app import main

main()
