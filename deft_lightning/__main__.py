"""``python -m deft_lightning {fit,validate,test} --config <yaml>`` | ``prepare-model`` | ``bench``."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "prepare-model":
    from deft_lightning.prepare_model import main as prepare_model_main

    prepare_model_main(sys.argv[2:])
elif len(sys.argv) > 1 and sys.argv[1] == "bench":
    from deft_lightning.bench import main as bench_main

    bench_main(sys.argv[2:])
else:
    from deft_lightning.cli import main

    main()
