from hpcserve.cli.entry import main

main()
