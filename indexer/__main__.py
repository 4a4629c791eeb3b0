from indexer.main import main

raise SystemExit(main())
