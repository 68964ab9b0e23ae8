from services.transcriber.app import main

main()
