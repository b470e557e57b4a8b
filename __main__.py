from tailforge.cli import main

raise SystemExit(main())
