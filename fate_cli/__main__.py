from fate_cli.entry import main

main()
