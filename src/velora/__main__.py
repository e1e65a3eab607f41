from velora.cli import main

raise SystemExit(main())
