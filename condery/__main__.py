from condery.cli import main

raise SystemExit(main())
