from devnet.main import main

raise SystemExit(main())
