from jetscribe.services.ingest.app import main

raise SystemExit(main())
