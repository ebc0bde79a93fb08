mod loom_dispatch;
