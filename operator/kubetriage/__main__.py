from kubetriage.main import main

raise SystemExit(main())
