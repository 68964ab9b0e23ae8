from jetscribe.services.ingest.app import main
from jetscribe.shared.telemetry import exit_process

exit_process(main())
