from punchgate.cli import main

raise SystemExit(main())
