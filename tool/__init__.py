"""The tool around the tutorial's scripts, one module per responsibility.

    quiet        TensorFlow's import with its C++ start-up records held back (import it first)
    errors       the expected mistakes: one line each, an exit code; signals outside the epochs
    data         images as the models take them (Data), their memory, the checks all sources share
    sources      --dataset's front door: Fashion-MNIST's IDX files, MNIST, .npz files
    folders      a folder of images: listed, decoded in parallel, split by a hash, labelled
    cli          the flags both scripts share, --resume's saved flags, main()
    lock         one process per run folder
    checkpoints  a run's checkpoints: found, read back whole, written by one traced call
    manifest     which files in a folder a run wrote (run.json's list), what --overwrite deletes
    resume       whether a folder may be continued or started in; the command that continues it
    files        JSON and CSV written whole, folder checks, clean-up, the words for a failed write
    writer       the background writer of an epoch's files
    run          the life of a run in its folder: check, lock, start, epochs, finish
    stop         what SIGINT and SIGTERM do during a run's epochs
    progress     progress bars and lines, progress.gif
    codes        PCA, k-nearest-neighbour accuracy, code statistics, scatter plots
    quality      sample quality: the Frechet distance in a small classifier's features
    export       the .keras file and the SavedModel a run writes, to load without the training code
    apply        --apply: a finished run's model on new images (codes, scores, reconstructions)
    anomaly      the anomaly threshold, and how well scores tell held-out classes (AUROC)

Arrows point one way: the scripts use this package and utils.py; the package uses utils.py
(its grids and files written whole); utils.py uses neither.
"""
