"""Where kmodd meets the outside: kmodctl (`cli`), the daemon and its file watcher, and
the D-Bus API (`dbus`), all thin around the layers below."""
