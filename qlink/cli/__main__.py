from qlink.cli.main import main

main()
