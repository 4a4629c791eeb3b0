from broadcaster.main import main

raise SystemExit(main())
