#!/bin/bash
# /usr/lib/dracut/modules.d/90kmodd — dracut takes nothing from updates/ or
# weak-updates/ by itself: add the modules of the REMAKE_INITRD sources kmodd installed
# for this kernel. instmods resolves each name with modprobe's view (weak links and
# dependencies included); hostonly='' because they need not be loaded on this host yet.

# always: what to add is decided per kernel in installkernel
check() {
    return 0
}

depends() {
    return 0
}

installkernel() {
    local kmodctl modules
    kmodctl=$(command -v kmodctl) || kmodctl=/usr/local/sbin/kmodctl  # apt's PATH lacks it
    [[ -x $kmodctl ]] || return 0
    if ! modules=$("$kmodctl" initrd-modules --kernel "${kernel:?}"); then
        dwarn "kmodd: cannot tell which modules belong in the initrd for $kernel"
        return 0
    fi
    # shellcheck disable=SC2086 # one name per word
    [[ -z $modules ]] || hostonly='' instmods $modules
}
