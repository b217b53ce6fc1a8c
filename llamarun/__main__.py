from llamarun.cli import main

main()
