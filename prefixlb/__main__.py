from prefixlb.cli import main

raise SystemExit(main())
