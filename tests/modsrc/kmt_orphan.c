// SPDX-License-Identifier: GPL-2.0
/* kmt_orphan: imports kmt_nowhere, which no kernel and no module exports (built with
 * KBUILD_MODPOST_WARN, as some packages' modules are, e.g. Debian dahdi's oslec). */
#include <linux/init.h>
#include <linux/module.h>

extern int kmt_nowhere(void);

static int __init kmt_orphan_init(void)
{
	return kmt_nowhere();
}

module_init(kmt_orphan_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodd test module: imports a symbol no one exports");
