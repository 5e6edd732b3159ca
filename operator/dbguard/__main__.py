from dbguard import cli

raise SystemExit(cli.main())
