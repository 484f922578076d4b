from dubber.cli import main

main()
