#!/usr/bin/env bash
# Install kmodd on a Debian/Ubuntu machine, as root, and start the service.
#   ./install.sh              install (again: upgrades in place) and start
#   ./install.sh --uninstall  remove all of it (kmodd's state in /var/lib/kmodd is kept)
# The Python package goes to a venv in /opt/kmodd, so the system's Python stays as it is.
set -euo pipefail
cd "$(dirname "$0")"

PREFIX=/opt/kmodd
SBIN=/usr/local/sbin
UNIT=/etc/systemd/system/kmodd.service
TMPFILES=/etc/tmpfiles.d/kmodd.conf
SYSUSERS=/usr/lib/sysusers.d/kmodd.conf
POLICY=/usr/share/dbus-1/system.d/io.kmodd1.conf
PLUGIN=/etc/kernel/install.d/40-kmodd.install
HOOKS=(/etc/kernel/postinst.d/40-kmodd /etc/kernel/header_postinst.d/40-kmodd
       /etc/kernel/prerm.d/40-kmodd /etc/kernel/postinst.d/zz-kmodd)
# the initrd generators' hooks: each adds the REMAKE_INITRD modules kmodd installed
# (`kmodctl initrd-modules`), and a check after each image is made (`kmodctl initrd-check`).
# Put in place whether or not the generator is installed yet: it may come with the
# first kernel.
INITRD_HOOKS=(/usr/share/initramfs-tools/hooks/kmodd /etc/initramfs/post-update.d/kmodd
              /usr/lib/dracut/modules.d/90kmodd/module-setup.sh)
MKINITCPIO_HOOKS=(/etc/initcpio/install/kmodd /etc/initcpio/post/kmodd
                  /etc/mkinitcpio.conf.d/kmodd.conf)
PIDFILE=/run/kmodd.pid

systemd_running() { [[ -d /run/systemd/system ]]; }
bus_answers() {
    dbus-send --system --print-reply --dest=org.freedesktop.DBus / \
        org.freedesktop.DBus.GetId >/dev/null 2>&1
}

stop_service() {
    if systemd_running; then
        systemctl disable --now kmodd.service 2>/dev/null || true
    elif [[ -f $PIDFILE ]]; then
        kill "$(cat "$PIDFILE")" 2>/dev/null || true
        rm -f "$PIDFILE"
    fi
}

if [[ ${1:-} == --uninstall ]]; then
    stop_service
    rm -f "$UNIT" "$TMPFILES" "$SYSUSERS" "$POLICY" "$PLUGIN" "${HOOKS[@]}" "${INITRD_HOOKS[@]}" \
        "${MKINITCPIO_HOOKS[@]}" "$SBIN/kmodctl" "$SBIN/kmodd"
    rmdir /usr/lib/dracut/modules.d/90kmodd 2>/dev/null || true
    systemd_running && systemctl daemon-reload || true
    [[ -S /run/dbus/system_bus_socket ]] && dbus-send --system --type=method_call \
        --dest=org.freedesktop.DBus / org.freedesktop.DBus.ReloadConfig 2>/dev/null || true
    rm -rf "$PREFIX"
    echo "kmodd uninstalled (its state in /var/lib/kmodd is kept)" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    python3-venv dbus kmod make gcc patch binutils xz-utils zstd bubblewrap >/dev/null

python3 -m venv "$PREFIX"
"$PREFIX/bin/pip" install --quiet --upgrade pip
"$PREFIX/bin/pip" install --quiet .
ln -sf "$PREFIX/bin/kmodctl" "$SBIN/kmodctl"
ln -sf "$PREFIX/bin/kmodd" "$SBIN/kmodd"

install -D -m 0644 systemd/io.kmodd1.conf "$POLICY"
install -D -m 0755 kernel-install.d/40-kmodd.install "$PLUGIN"
install -D -m 0755 debian-hooks/postinst /etc/kernel/postinst.d/40-kmodd
install -D -m 0755 debian-hooks/header_postinst /etc/kernel/header_postinst.d/40-kmodd
install -D -m 0755 debian-hooks/prerm /etc/kernel/prerm.d/40-kmodd
install -D -m 0755 debian-hooks/postinst-check /etc/kernel/postinst.d/zz-kmodd
install -D -m 0755 initrd/initramfs-tools/hook /usr/share/initramfs-tools/hooks/kmodd
install -D -m 0755 initrd/initramfs-tools/post-update /etc/initramfs/post-update.d/kmodd
install -D -m 0755 initrd/dracut/90kmodd/module-setup.sh \
    /usr/lib/dracut/modules.d/90kmodd/module-setup.sh
if [[ -e /etc/mkinitcpio.conf ]]; then  # Arch's generator (not packaged by Debian)
    install -D -m 0755 initrd/mkinitcpio/install /etc/initcpio/install/kmodd
    install -D -m 0755 initrd/mkinitcpio/post /etc/initcpio/post/kmodd
    install -D -m 0644 initrd/mkinitcpio/kmodd.conf /etc/mkinitcpio.conf.d/kmodd.conf
fi
install -d -m 0755 /var/lib/kmodd
# the unprivileged user package code is built as, in kmodd's sandbox
install -D -m 0644 systemd/kmodd.sysusers "$SYSUSERS"
if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers "$SYSUSERS"
elif ! id kmodd-build >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        --comment "kmodd builds of kernel module sources" kmodd-build
fi
# the modules dir the service writes, there before it starts (see the unit)
install -D -m 0644 systemd/kmodd.tmpfiles "$TMPFILES"
if command -v systemd-tmpfiles >/dev/null; then
    systemd-tmpfiles --create "$TMPFILES"
else
    install -d -m 0755 /lib/modules
fi

if systemd_running; then
    install -D -m 0644 systemd/kmodd.service "$UNIT"
    systemctl daemon-reload
    systemctl reload dbus.service 2>/dev/null || true
    systemctl enable --now kmodd.service
    systemctl restart kmodd.service
else
    # no systemd as PID 1 (a container): the system bus, then the service on it.
    # A socket file alone proves nothing: a bus that died leaves it behind.
    if bus_answers; then
        dbus-send --system --type=method_call --dest=org.freedesktop.DBus / \
            org.freedesktop.DBus.ReloadConfig >/dev/null 2>&1 || true
    else
        [[ -e /run/dbus/system_bus_socket ]] &&
            echo "the system bus left a socket but does not answer: starting it again" >&2
        rm -f /run/dbus/system_bus_socket /run/dbus/pid
        mkdir -p /run/dbus
        dbus-daemon --system --fork
    fi
    stop_service
    nohup "$SBIN/kmodd" >>/var/log/kmodd.log 2>&1 &
    echo $! >"$PIDFILE"
fi

# ready when it answers on the bus
for _ in $(seq 100); do
    if busctl --system status io.kmodd1 >/dev/null 2>&1 ||
        dbus-send --system --print-reply --dest=io.kmodd1 /io/kmodd1 \
            org.freedesktop.DBus.Peer.Ping >/dev/null 2>&1; then
        echo "kmodd installed and running: $("$SBIN/kmodctl" --version)" >&2
        exit 0
    fi
    sleep 0.2
done
echo "kmodd installed, but the service did not come up; its last words:" >&2
if systemd_running; then
    journalctl -u kmodd.service -n 20 --no-pager >&2 || true
else
    tail -n 20 /var/log/kmodd.log >&2 || true
fi
exit 1
