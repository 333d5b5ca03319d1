"""``python -m deft_lightning {fit,validate,test} --config <yaml>``, or one of ``evaluate``, ``analyze``, ``sweep``,
``export``, ``prepare-model``, ``bench``."""

import sys

command = sys.argv[1] if len(sys.argv) > 1 else None
if command == "prepare-model":
    from deft_lightning.prepare_model import main as prepare_model_main

    prepare_model_main(sys.argv[2:])
elif command == "bench":
    from deft_lightning.bench import main as bench_main

    bench_main(sys.argv[2:])
elif command == "analyze":
    from deft_lightning.analysis.run import main as analyze_main

    analyze_main(sys.argv[2:])
elif command == "sweep":
    from deft_lightning.sweep import main as sweep_main

    sweep_main(sys.argv[2:])
elif command == "export":
    from deft_lightning.export import main as export_main

    export_main(sys.argv[2:])
elif command == "evaluate":
    from deft_lightning.evaluation.run import main as evaluate_main

    evaluate_main(sys.argv[2:])
else:
    from deft_lightning.cli import main

    main()
