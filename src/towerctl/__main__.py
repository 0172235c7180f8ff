from towerctl.console import main

main()
