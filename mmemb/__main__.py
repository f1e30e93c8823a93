from mmemb.cli import main

main()
