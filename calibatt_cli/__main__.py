from calibatt_cli.cli import main

main()
