from fate_cli.app import main

main()
