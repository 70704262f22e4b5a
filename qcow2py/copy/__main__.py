from ..cli.copy import main

raise SystemExit(main())
