from towerctl.cli import main

main()
