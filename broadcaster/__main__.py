from shared import stop_signals

stop_signals.hold()  # before the imports below, which take most of a second

from broadcaster.main import main  # noqa: E402

raise SystemExit(main())
