// SPDX-License-Identifier: GPL-2.0
/* kmt_pkgc: exports kmt_pkgc_hello; imports misc_register (not reusable). */
#include <linux/export.h>
#include <linux/fs.h>
#include <linux/init.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/printk.h>
#include "kmt_pkgc.h"

static const struct file_operations kmt_pkgc_fops = {
	.owner = THIS_MODULE,
};

static struct miscdevice kmt_pkgc_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "kmt_pkgc",
	.fops = &kmt_pkgc_fops,
};

int kmt_pkgc_hello(void)
{
	pr_info("kmt_pkgc: hello\n");
	return 0;
}
EXPORT_SYMBOL(kmt_pkgc_hello);

static int __init kmt_pkgc_init(void)
{
	int ret = misc_register(&kmt_pkgc_dev);

	if (ret)
		return ret;
	pr_info("kmt_pkgc: loaded\n");
	return 0;
}

static void __exit kmt_pkgc_exit(void)
{
	misc_deregister(&kmt_pkgc_dev);
}

module_init(kmt_pkgc_init);
module_exit(kmt_pkgc_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodd test module: non-reusable symbol provider");
