from jetscribe.services.transcriber.app import main

raise SystemExit(main())
