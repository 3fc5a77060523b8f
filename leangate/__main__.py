from leangate.cli import main

main()
