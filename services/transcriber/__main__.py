from jetscribe.services.transcriber.app import main
from jetscribe.shared.telemetry import exit_process

exit_process(main())
