from voxrelay.cli.main import main

main()
