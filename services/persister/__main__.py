from jetscribe.services.persister.app import main
from jetscribe.shared.telemetry import exit_process

exit_process(main())
