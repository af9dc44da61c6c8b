from repdisk.cli import main

raise SystemExit(main())
