mod loom_grant;
