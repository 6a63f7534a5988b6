from traduire.cli import main

main()
