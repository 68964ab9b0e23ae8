from jetscribe.services.persister.app import main

raise SystemExit(main())
