from mgd3.cli import main

raise SystemExit(main())
