from jetscribe.services.web.app import main
from jetscribe.shared.telemetry import exit_process

exit_process(main())
