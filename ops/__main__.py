from ops.main import main

raise SystemExit(main())
